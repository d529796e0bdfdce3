"""Resume a run and save the step it resumed from again, as a run whose stop signal arrives right after an
interval save does: `python resave_run.py OVERRIDE...` (the overrides of `opt-ds train -`). With
faults.kill_in_publish_gap_at_step armed it dies between setting the published copy aside and renaming the
new one into place."""
import os
import sys

from opt_ds.config import load_config
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.train.loop import Trainer

trainer = Trainer(load_config(None, sys.argv[1:], world_size=int(os.environ.get("WORLD_SIZE", "1"))))
trainer.save()
trainer.close()
shutdown_distributed()
