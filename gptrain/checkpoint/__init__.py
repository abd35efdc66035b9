"""Preemption-safe sharded checkpoints: save, commit, resume, export.

    commit.py        RUN_DIR/checkpoints/step-<N>/ folders, commit markers (sizes, sha256s), latest, retention
    checksums.py     DCP's writer, hashing every file as it writes it
    store.py         what a checkpoint holds; writing/reading it with torch.distributed.checkpoint
    lease.py         one writer per run directory: RUN_DIR/lease.json with a heartbeat
    checkpointer.py  the trainer's checkpointer: periodic/async/final saves and resuming
    preemption.py    SIGTERM/SIGUSR1/SIGUSR2 -> agree at a step boundary -> save -> exit 75
    export.py        `gptrain export`: a checkpoint as an HF-layout safetensors folder

Nothing is imported here, so `gptrain --help` (which imports export.py for its parser) stays
fast; import from the modules.
"""
