"""The engine under the reading set: exact speed-ups of clip_layers (clip_engine), checkpoint files read
without trusting them (checkpoints), run directories that lose nothing (rundir), one-line errors (cli)."""
