"""Convert checkpoints between Hugging Face safetensors and megagrpo's megatron TP x PP shards.

    python tools/convert_checkpoint.py hf-to-megatron Qwen2.5-1.5B/ ckpt/ --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf ckpt/ Qwen2.5-1.5B-back/

Same as ``megagrpo convert``. Both directions stream tensor by tensor and keep dtypes, so a
round trip is bit-identical; config, tokenizer and generation files are carried along.
"""

import argparse
import sys

from megagrpo.cli import _cmd_convert, _quiet_optional_dependency_warnings, add_convert_arguments

if __name__ == "__main__":
    _quiet_optional_dependency_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_convert_arguments(parser)
    sys.exit(_cmd_convert(parser.parse_args()))
