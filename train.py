"""Train WeatherMixer on a DP x DOMAIN x TP mesh with DeepSpeed: the repository's launch script.

The code lives in weathermixer/train/main.py (installed as the console script `weathermixer-train`);
this file keeps the launch commands that name a script working from the repository root:

    deepspeed --num_gpus 4 train.py --deepspeed_config deepspeed_configs/quickstart_cpu.json
    torchrun --nproc_per_node 2 train.py --deepspeed_config ... --domain 2 --tp 1
    python train.py --deepspeed_config ... --domain 1 --tp 1            (one process)

`python train.py --help` lists every flag.
"""

import sys

from weathermixer.train.main import cli

if __name__ == "__main__":
    sys.exit(cli())
