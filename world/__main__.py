"""
`python -m world`: draw the mini world's datasets, pre-train its CLIP, print its report.

    python -m world --render --root data    # draw the datasets (train.py draws the one it needs on first use)
    python -m world --report --root data    # the world's targets on its CLIP: zero-shot, frames, probes
    python -m world --pretrain              # re-train the CLIP (world/pretrain.py) into a new file

The world itself is world/mini_world.py (the datasets), world/pretrain.py (its CLIP's pre-training) and
world/report.py (the targets of its design, measured on a frozen CLIP).
"""
import argparse
import os

from engine import cli
from world import mini_world
from world.mini_world import NEW_CLIP_PATH, PROJECT, WORLD_CLIP_PATH


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m world", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--root", default=os.environ.get("DATA", "data"),
                   help="where the world's datasets are drawn, as train.py's --root "
                        "(<root>/mini_world*); default: $DATA if set, else data")
    p.add_argument("--render", action="store_true", help="draw the world's datasets under --root")
    p.add_argument("--pretrain", action="store_true",
                   help="pre-train a world CLIP (world/pretrain.py) into --weights, by default "
                        f"{os.path.relpath(NEW_CLIP_PATH, PROJECT)} beside the shipped weights, never "
                        "over them unless --weights names them, then print its report (--report)")
    p.add_argument("--report", action="store_true",
                   help="the report of --weights (world/report.py): zero-shot accuracy, the "
                        "datasets' own templates, 1/4/16-shot and all-image linear probes, the "
                        "targets met")
    p.add_argument("--weights", help="the world CLIP file to read (--report; default: the shipped "
                   f"{os.path.relpath(WORLD_CLIP_PATH, PROJECT)}) or to write (--pretrain)")
    args = p.parse_args(argv)
    if not (args.render or args.pretrain or args.report):
        p.error("give --render, --pretrain or --report")
    weights = args.weights or (NEW_CLIP_PATH if args.pretrain else WORLD_CLIP_PATH)
    if args.pretrain:
        from world import pretrain  # the caption grammar and the training loop: only needed here
        pretrain.pretrain_world_clip(weights)
    mini_world.render_world(args.root)
    if args.pretrain or args.report:
        from world import report  # zero-shot, frames and probes: only needed here
        report.world_report(mini_world.load_world_clip(weights), args.root)
    return 0


if __name__ == "__main__":  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
