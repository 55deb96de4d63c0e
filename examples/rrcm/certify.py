"""Certify a test set with a saved RRCMPipeline (or DDSPipeline) on every process of the launch.

    python examples/rrcm/certify.py --pipeline runs/rrcm/rrcm-sigma0.5/pipeline --per-class 50 --sigma 0.5 --out runs/cert
    accelerate launch --num_processes 8 examples/rrcm/certify.py --pipeline ... --out runs/cert

Certificates do not depend on the number of processes; the same command again resumes a killed
run. OUT/certificates.jsonl holds one line per image, OUT/report/ the report.
"""

# the console script's entry point (rrcm-certify): an error found after the start ends the script with its
# message and exit status 2, as a bad flag does, not a traceback
from rrcm_diffusers.console import certify

if __name__ == "__main__":
    certify()
