"""The run folder and what keeps a run safe: checkpoints (`checkpoint`), the folder's files and resume rules
(`folder`), signals and resume commands (`lifecycle`), the disk-space check (`diskspace`), trackers as
sinks (`trackers`), the model card (`card`) and the curves (`plots`)."""
