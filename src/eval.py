"""Re-test a trained checkpoint: python src/eval.py ckpt_path=outputs/.../checkpoints/last.ckpt."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from allconv import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from allconv import experiment
    from allconv.data import DataError

    try:
        result = experiment.evaluate(cfg.ckpt_path, OmegaConf.to_container(cfg.data),
                                     OmegaConf.to_container(cfg.trainer))
    except (experiment.ConfigError, DataError) as e:
        cli.fail(str(e), code=1)
    out = cli.run_dir() / "eval.json"
    experiment.write_json(out, result)
    print(f"{result['model']} on {result['data']}: test error {result['test_error']:.4f}  ->  {out}")


if __name__ == "__main__":
    from allconv.experiment import load_checkpoint_config

    cli.preflight("eval", sys.argv, check=lambda cfg: load_checkpoint_config(cfg.ckpt_path))
    main()
