"""rRCM vs Cohen vs DDS, certified in one harness: trains what is missing, then writes the report.

    python examples/rrcm/certify_report.py --config examples/rrcm/configs/mnist_small.yaml --out runs/rrcm

OUT/report/ holds report.md, results.csv, results.json and certified_accuracy.png; stages
already present in OUT are reused (an interrupted run resumes).
"""

# the console script's entry point (rrcm-experiment): an error found after the start ends the script with
# its message and exit status 2, as a bad flag does, not a traceback
from rrcm_diffusers.console import experiment

if __name__ == "__main__":
    experiment()
