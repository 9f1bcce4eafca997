"""Train one of the paper's networks: python src/train.py model=all_cnn_c optim.lr=0.05  (-m to sweep)."""

import sys

import hydra
from omegaconf import DictConfig

from allconv import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return cli.train_job(cfg)


if __name__ == "__main__":
    from allconv.resume import expand_argv

    cli.setup()
    sys.argv = cli.run(lambda: expand_argv(sys.argv))  # resume=<run dir> -> that run's overrides + its last.ckpt
    cli.main(main)
