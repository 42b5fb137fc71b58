"""Training: pretrain a small model from scratch, fine-tune one (full or LoRA), resume, evaluate.

    bpe.py          byte-level BPE tokenizer training (`llmos tokenizer train`)
    data.py         files -> documents -> memory-mapped token shards (train/val, chat loss masks) -> windows
    presets.py      model sizes (tiny ... large) in Llama or GPT-2 shape, and their initialisation
    loop.py         the one training loop: AdamW, warm-up + cosine, accumulation, clipping, bf16, DDP
    checkpoint.py   atomic checkpoints and finding the newest complete one
    log.py          log.csv / log.jsonl / loss.png
    distributed.py  torchrun process groups (gloo on CPU, NCCL on GPUs)
    evaluate.py     perplexity on held-out text
    run.py          run folders: pretrain(), finetune(), resume(), load_model()

Export to Hugging Face folders and GGUF files lives in llmos/weights/export.py; LoRA modules in
llmos/models/lora.py. Imports are explicit (`from llmos.train.run import pretrain`), so `import
llmos.train` costs nothing.
"""
