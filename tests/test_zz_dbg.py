import os
from pathlib import Path
from tests.support.wandb_records import records
def test_dbg(tmp_path):
    print({k: v for k, v in os.environ.items() if "WANDB" in k})
    import wandb
    run = wandb.init(project="p", dir=str(tmp_path), mode="offline", name="n")
    run.log({"x": 1})
    d = Path(run.dir).parent
    run.finish()
    (log,) = d.glob("run-*.wandb")
    print(log.stat().st_size, [r.WhichOneof("record_type") for r in records(log)][:10])
    assert 0
