"""The engine under the reading set: exact speed-ups of clip_layers (clip_engine), a run's directory behind one
object (run), what a run reads (inputs), checkpoint files read without trusting them (checkpoints), run directories
that lose nothing (rundir), the compute precision (precision), one-line errors and the flags' checks (cli)."""
