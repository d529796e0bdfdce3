"""Worker: the GQA test LLaMA with Hugging Face's weights in a TP=2 x PP=2 DeepSpeed engine; saves the full
logits of the test input.   usage (4 ranks under torchrun): llama_hf_run.py OUT.pt"""
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_llama_reference import load_into, pipeline_state, random_hf_llama  # noqa: E402
from test_model_llama_hf_equivalence import INPUT, SHAPES  # noqa: E402

from opt_ds.parallel.layout import ParallelLayout, shutdown_distributed  # noqa: E402
from opt_ds.parallel.pipe import build_pipeline  # noqa: E402


def main():
    shape = SHAPES["gqa"]
    layout = ParallelLayout(2, 2, 1)
    layout.initialize()
    module = build_pipeline(shape, layout)
    load_into(module, pipeline_state(random_hf_llama(shape), shape),
              tp_rank=dist.get_rank(layout.tensor_group()), tp_size=2)
    micro = INPUT.shape[0]
    engine = deepspeed.initialize(model=module, config={
        "train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "steps_per_print": 10 ** 9})[0]
    engine.eval()
    labels = (torch.zeros_like(INPUT), torch.zeros(INPUT.shape))
    _, logits = engine.eval_batch(iter([(INPUT, labels)]), return_logits=True, compute_loss=False,
                                  reduce_output=None, bcast_loss=False, num_micro_batches=1)
    if engine.is_last_stage():
        full = gather_from_tensor_model_parallel_region(logits.float().contiguous())
        if engine.grid.get_slice_parallel_rank() == 0:
            torch.save(full.cpu(), sys.argv[1])


if __name__ == "__main__":
    main()
    shutdown_distributed()
