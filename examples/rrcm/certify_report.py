"""rRCM vs Cohen vs DDS, certified in one harness: trains what is missing, then writes the report.

    python examples/rrcm/certify_report.py --config examples/rrcm/configs/mnist_small.yaml --out runs/rrcm

OUT/report/ holds report.md, results.csv, results.json and certified_accuracy.png; stages
already present in OUT are reused (an interrupted run resumes).
"""

from rrcm_diffusers.experiment import main

if __name__ == "__main__":
    main()
