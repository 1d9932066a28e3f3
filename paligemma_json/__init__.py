"""What is not a step of the flow in `finetune_paligemma2.py`: metrics and the offline demo's assets."""
