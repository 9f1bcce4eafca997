"""Train one of the paper's networks: python src/train.py model=all_cnn_c optim.lr=0.05  (-m to sweep)."""

import sys

import hydra
from omegaconf import DictConfig

from allconv import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from allconv import experiment
    from allconv.callbacks import NonFiniteLossError
    from allconv.data import DataError

    if cfg.print_config:
        cli.print_config_tree(cfg)
    out = cli.run_dir()
    try:
        metrics = experiment.train(cfg, out)
    except (experiment.ConfigError, DataError, NonFiniteLossError) as e:
        failed = {"status": "failed", "error": str(e), "model": cli.model_name(cfg)}
        experiment.write_json(out / "metrics.json", {**failed, "lr": cfg.optim.lr, "seed": cfg.seed})
        if cli.is_multirun():  # the sweep goes on; the report lists this run as failed
            print(f"error: {e}", file=sys.stderr)
            return None
        cli.fail(str(e), code=1)
    except Exception as e:  # in a sweep any crash is recorded and the other jobs go on
        if not cli.is_multirun():
            raise
        import traceback

        traceback.print_exc()
        failed = {"status": "failed", "error": f"{type(e).__name__}: {e}", "model": cli.model_name(cfg)}
        experiment.write_json(out / "metrics.json", {**failed, "lr": cfg.optim.lr, "seed": cfg.seed})
        return None
    print(f"test error {metrics['test_error']:.4f}  ->  {out / 'metrics.json'}")
    return metrics["test_error"]


if __name__ == "__main__":
    from allconv.experiment import preflight_check
    from allconv.resume import ResumeError, expand_argv

    try:
        sys.argv = expand_argv(sys.argv)  # resume=<run dir> -> that run's overrides + its last.ckpt
    except ResumeError as e:
        cli.fail(str(e))
    cli.preflight("train", sys.argv, check=preflight_check)
    main()
