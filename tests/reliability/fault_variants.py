"""Variants that bring faults into a real search: a process that dies, a variant that exits, a disk that fills,
and a trial slow enough to be caught running. Loaded through a spec's ``plugins:`` list like any user plugin."""

import errno
import os
import sys
import time
from pathlib import Path

from autopeft import CategoricalParam, Variant, hookimpl, shared


class Faulty(Variant):
    name = "faulty"
    summary = "LoRA whose 'fault' parameter picks how the trial goes wrong"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "fault": CategoricalParam(("none", "os-exit", "os-exit-at-default", "sys-exit", "fill-disk", "enospc-once", "slow"), default="none"),
            "r": CategoricalParam((2, 4, 8), default=2),
        }

    def attach(self, model, params, context):
        from peft import LoraConfig, get_peft_model

        fault = params["fault"]
        if fault == "os-exit" or (fault == "os-exit-at-default" and params["learning_rate"] == float(os.environ["AUTOPEFT_TEST_POISON_LR"])):
            os._exit(3)  # the process dies on the spot: no exception, no cleanup (like a segfault or the OOM killer)
        if fault == "sys-exit":
            sys.exit(3)
        if fault == "fill-disk":
            # Another program fills the disk the run folder lives on, once.
            filler = Path(os.environ["AUTOPEFT_TEST_FILLER"])
            if not filler.with_suffix(".done").exists():
                filler.with_suffix(".done").touch()
                with open(filler, "wb") as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 65536)
                            handle.flush()
                    except OSError:
                        pass
        if fault == "slow":
            time.sleep(float(os.environ.get("AUTOPEFT_TEST_SLOW_SECONDS", "6")))
        self.fault = fault
        return get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=params["r"]))

    def export(self, model, out_dir):
        # The adapter cannot be written because the disk is full, once (the marker says it happened).
        marker = Path(os.environ.get("AUTOPEFT_TEST_ENOSPC_MARKER", "/nonexistent/marker"))
        if self.fault == "enospc-once" and not marker.exists():
            marker.touch()
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))
        super().export(model, out_dir)


@hookimpl
def autopeft_variants():
    return [Faulty()]
