"""Merging per-category LoRA experts into one safety LoRA.

``lora_file`` reads experts and writes the merged adapter in the diffusers format; ``methods`` holds the
pure-tensor merge methods (Co-Merge, linear, TIES, DARE). The Ray Tune search over their settings will
join this package later.
"""
