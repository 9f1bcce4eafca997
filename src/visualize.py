"""Draw a trained run's figures from its checkpoint: python src/visualize.py ckpt_path=... [viz.figure=filters].

viz.figure: reconstructions (default; viz.layer=block2.down viz.top_k=9 ...), filters, whitening
(allconv.visualize_run, docs/visualize.md). Prints each PNG it wrote, then their folder.
"""

import hydra
from omegaconf import DictConfig

from allconv import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    from allconv import visualize_run

    out, paths = cli.run(lambda: visualize_run.render(cfg))
    for p in paths:
        print(p)
    print(out)


if __name__ == "__main__":
    cli.setup()
    cli.main(main)
