"""Fine-tune an embedding model with the Conan recipe (or a baseline) and evaluate it with mteb.

One process:
    python examples/conan/train.py --recipe conan --out runs/conan
Two CPU processes (rank 0 retrieval, rank 1 STS — the Cross-GPU Batch Balance layout):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no examples/conan/train.py --recipe conan --out runs/conan2
Several GPUs / nodes: the usual `accelerate launch --num_processes N [--num_machines M ...]`.

Writes OUT/final (a sentence-transformers model whose card cites the losses it was trained
with) and OUT/record.json (timings, loss log, mining checks, mteb scores).
"""

# the console script's entry point (conan-experiment): an error found after the start ends the script with
# its message and exit status 2, as a bad flag does, not a traceback
from conan_st.console import experiment

if __name__ == "__main__":
    experiment()
