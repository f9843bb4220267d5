"""The stage kinds of a run, one module each: its `StageKind` (calq.stages) and the function its stages run.
`calq.stages.KINDS.discover()` imports every module here."""
