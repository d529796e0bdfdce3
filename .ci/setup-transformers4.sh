#!/usr/bin/env bash
# Installs Hugging Face transformers 4.x (whose convert_opt_original_pytorch_checkpoint_to_pytorch reads
# metaseq files) into a throw-away folder beside the project's venv, so the conversion tests can check that
# metaseq checkpoints written by opt_ds are accepted by that tool unchanged. Prints the folder.
set -euo pipefail
DEST=${1:-.ci-tools}
if [ ! -f "$DEST/.ready" ]; then
    rm -rf "$DEST" "$DEST.wheels"
    python3 -m pip download -q --no-deps -d "$DEST.wheels" 'transformers==4.46.3' 'tokenizers>=0.20,<0.21' \
        'huggingface_hub<1.0' fire termcolor requests urllib3 idna certifi charset_normalizer >&2
    python3 -m pip install -q --no-deps --target "$DEST" "$DEST.wheels"/*.whl >&2
    rm -rf "$DEST.wheels"
    touch "$DEST/.ready"
fi
cd "$DEST" && pwd
