"""Re-test a trained checkpoint: python src/eval.py ckpt_path=outputs/.../checkpoints/last.ckpt."""

import hydra
from omegaconf import DictConfig

from allconv import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from allconv import run_record, training

    result = cli.run(lambda: training.evaluate(cfg))
    out = cli.run_dir() / "eval.json"
    cli.run(lambda: run_record.write_json(out, result))
    print(f"{result['model']} on {result['data']}: test error {result['test_error']:.4f}  ->  {out}")


if __name__ == "__main__":
    cli.setup()
    cli.main(main)
