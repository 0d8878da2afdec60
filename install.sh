#!/usr/bin/env bash
# Install mup_schedulefree with its dev tools and the integrations' frameworks (transformers, accelerate,
# lightning: the extras hf and lightning) into the active Python, without ever swapping torch.
#
# Two traps this avoids:
# - An unpinned `torch` requirement pulls the newest CUDA build (several GB) and replaces a CPU torch.
#   Every pip call below runs under a constraint that pins torch: to the version already installed,
#   or to TORCH_VERSION (default 2.13.0) when there is none yet.
# - mup 1.0.0 declares `torchvision`, which it never imports; the registry's torchvision is built
#   against CUDA torch and fails to import beside a CPU torch. mup is therefore installed with
#   --no-deps, and this package with --no-deps after its other requirements, read from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

installed_torch=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${installed_torch:-${TORCH_VERSION:-2.13.0}}" >"$constraints"

"$PY" -m pip install -q -c "$constraints" torch
"$PY" -m pip install -q --no-deps "mup==1.0.0"
"$PY" - <<'PYEOF' >"$constraints.reqs"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + extras["dev"] + extras["hf"] + extras["lightning"]:
    if not req.startswith("mup"):
        print(req)
PYEOF
"$PY" -m pip install -q -c "$constraints" -r "$constraints.reqs"
rm -f "$constraints.reqs"
"$PY" -m pip install -q --no-deps -e .
# Lightning imports torchvision through torchmetrics whenever torchvision is installed; a registry
# torchvision built for another torch breaks that import, so it is checked here, not in the tests.
"$PY" -c 'import torch, mup, mup_schedulefree, transformers, accelerate, lightning.pytorch; print(f"installed mup_schedulefree with torch {torch.__version__}")'
