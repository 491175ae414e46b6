"""Getting checkpoints out: HF llava export (:mod:`.llava`), LoRA adapters and merging (:mod:`.adapter`), model
cards (:mod:`.card`).  ``vlweave export`` is the command line of all three."""
