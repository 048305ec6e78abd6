"""Training: QLoRA (a frozen NF4 base from bitsandbytes, LoRA adapters from PEFT) on packed samples.

    edge_lora.train.loop.train(TrainConfig) -> adapter dir
"""
