"""The GPU check: each VLM family's tiny preset through bf16 LoRA, QLoRA and unsloth.

Run on a CUDA machine after `make run`: python scripts/gpu_check.py  (see semilens.gpu_check)
"""

from semilens.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
