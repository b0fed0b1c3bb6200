# Sourced (not run) at the repository root of a GPU machine whose Python already has torch and the
# common scientific packages but not the rest of mlpsweep's dependencies: installs the wheels carried
# in .whl/ into /tmp/site (once per set of wheels), puts it and src/ on PYTHONPATH, and unpacks the
# gzipped MNIST IDX files carried in .mnist/MNIST/raw/ (data.py reads them uncompressed).
#
#   . benchmarks/gpu_env.sh && benchmarks/gpu_check.sh "$OUT"
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
