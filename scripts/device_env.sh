# Sourced at the start of every command on the GPU machine: installs the carried wheels
# (.whl/, for packages that machine lacks) into /tmp/site, and points Python at the repo.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
