"""Certify a test set with a saved RRCMPipeline (or DDSPipeline) on every process of the launch.

    python examples/rrcm/certify.py --pipeline runs/rrcm/rrcm-sigma0.5/pipeline --per-class 50 --sigma 0.5 --out runs/cert
    accelerate launch --num_processes 8 examples/rrcm/certify.py --pipeline ... --out runs/cert

Certificates do not depend on the number of processes; the same command again resumes a killed
run. OUT/certificates.jsonl holds one line per image, OUT/report/ the report.
"""

from rrcm_diffusers.dataset_certification import main

if __name__ == "__main__":
    main()
