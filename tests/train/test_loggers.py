import csv

from refrag.train.loggers import CSVLogger, TensorBoardLogger, make_loggers


def test_metrics_go_to_csv_and_tensorboard_by_default(tmp_path):
    loggers = make_loggers(tmp_path, start_step=0, run_name="t")
    assert any(isinstance(lg, TensorBoardLogger) for lg in loggers)
    for lg in loggers:
        lg.log_dict({"train/loss": 2.5}, step=1)
        lg.close()
    assert list(csv.reader((tmp_path / "metrics.csv").open())) == [["step", "name", "value"], ["1", "train/loss", "2.5"]]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_csv_resume_drops_rows_after_the_checkpoint(tmp_path):
    first = CSVLogger(tmp_path / "m.csv")
    for step in (1, 2, 3):
        first.log_dict({"loss": float(step)}, step)
    first.close()
    resumed = CSVLogger(tmp_path / "m.csv", start_step=2)
    resumed.log_dict({"loss": 9.0}, 3)
    resumed.close()
    rows = list(csv.reader((tmp_path / "m.csv").open()))[1:]
    assert rows == [["1", "loss", "1"], ["2", "loss", "2"], ["3", "loss", "9"]]
