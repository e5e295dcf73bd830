#!/usr/bin/env bash
# Unpack MSD Task03_Liver.tar under the datasets root and prepare it (axial slices).
# Usage: bash datasets/prepare_msd.sh /path/to/Task03_Liver.tar [extra prepare_data.py options]
set -euo pipefail
tar_file=${1:?usage: prepare_msd.sh /path/to/Task03_Liver.tar [prepare options]}
shift
root=${LIVER_D2_DATASETS:-datasets}
mkdir -p "$root"
if [ ! -d "$root/Task03_Liver/imagesTr" ]; then
  tar -xf "$tar_file" -C "$root"
fi
python tools/prepare_data.py --source "$root/Task03_Liver" --name liver_msd "$@"
