"""`opt-ds bench`: training throughput that can be compared with papers and peers.

  cases.py      named cases (shape × layout × batch × precision × checkpointing) and `name:key=value`
  worker.py     one measurement per process group: the real DeepSpeed pipeline engine's train_batch
  peer.py       Hugging Face OPTForCausalLM on the same work, plain and inside DeepSpeed ZeRO-1
  layer.py      one decoder layer's forward+backward, the input of the projection
  timing.py     CUDA-event / perf_counter step timing
  telemetry.py  peak memory, NVML energy/power/utilisation, carbon
  flops.py      FLOPs per step under three conventions;  peaks.py  dense peak table for MFU
  metrics.py    derived numbers of a row;  report.py  table, JSON lines, PNG
  suite.py      runs the cases in worker processes;  project.py  large-run projection
  cli.py        the `opt-ds bench` command
"""
