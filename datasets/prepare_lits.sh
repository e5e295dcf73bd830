#!/usr/bin/env bash
# Link LiTS volume-N.nii / segmentation-N.nii files under the datasets root and prepare them.
# Usage: bash datasets/prepare_lits.sh /folder/with/lits/batches [extra prepare_data.py options]
set -euo pipefail
src=${1:?usage: prepare_lits.sh /folder/with/lits/batches [prepare options]}
shift
root=${LIVER_D2_DATASETS:-datasets}
mkdir -p "$root/LiTS"
find "$(cd "$src" && pwd)" -name 'volume-*.nii*' -o -name 'segmentation-*.nii*' | while read -r f; do
  ln -sf "$f" "$root/LiTS/$(basename "$f")"
done
python tools/prepare_data.py --source "$root/LiTS" --name liver_lits "$@"
