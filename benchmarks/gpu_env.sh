# Sourced (not run) at the repository root of a GPU machine whose Python already has torch and the
# common scientific packages but not the rest of mlpsweep's dependencies: installs the wheels carried
# in .whl/ into /tmp/site (once per set of wheels), puts it and src/ on PYTHONPATH, and unpacks the
# gzipped MNIST IDX files carried in .mnist/MNIST/raw/ (data.py reads them uncompressed).
#
#   . benchmarks/gpu_env.sh && benchmarks/gpu_check.sh "$OUT"
#
# Both folders are made on the development machine and kept out of git (.git/info/exclude):
#   .whl:   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#               -d /tmp/whl-all <the project's dependencies at .venv's versions, not torch>
#           then copy into .whl those the GPU image lacks (about 36 MB: mlflow, SQLAlchemy, hydra-core, ...)
#   .mnist: mkdir -p .mnist/MNIST/raw && gzip -9 -c $MNIST_ROOT/MNIST/raw/X > .mnist/MNIST/raw/X.gz for the 4 IDX files
_site=/tmp/site
_stamp=$(ls .whl)
if [ "$(cat "$_site/.wheels" 2>/dev/null)" != "$_stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_site" .whl/*.whl \
        && printf '%s\n' "$_stamp" > "$_site/.wheels" \
        || echo "gpu_env.sh: installing .whl/*.whl into $_site failed" >&2
fi
export PYTHONPATH=$_site:$PWD/src
export PATH=$_site/bin:$PATH
export MNIST_ROOT=${MNIST_ROOT:-$PWD/.mnist}
export PYTHONUNBUFFERED=1
for _gz in "$MNIST_ROOT"/MNIST/raw/*-ubyte.gz; do
    if [ -f "$_gz" ] && [ ! -f "${_gz%.gz}" ]; then gunzip -k "$_gz"; fi
done
unset _site _stamp _gz
# version conflicts between the carried wheels and the image's packages (or within the image); silent when none
python3 -m pip check 2>&1 | grep -v '^No broken requirements' | head -20 || true
python3 -c 'import mlflow, hydra, torch; print(mlflow.__version__, torch.__version__)'
