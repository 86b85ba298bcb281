# Sourced by the Makefile's recipes: the build and run environment of this checkout.
# libtorch comes from the project-local virtualenv's torch==2.11.0 wheel (tch =0.24.0 needs
# exactly that version); the wheel's Python module cannot be imported without its CUDA
# libraries, so torch-sys is pointed at the directory instead of asking Python.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$root/.venv"
export PATH="$root/.venv/bin:$PATH"
# Resolved through links, so worktrees sharing one .venv hand cargo the same LIBTORCH (a
# different string would rebuild torch-sys).
LIBTORCH="$(ls -d "$root"/.venv/lib/python3*/site-packages/torch 2>/dev/null | head -n 1)"
[ -z "$LIBTORCH" ] || LIBTORCH="$(readlink -f "$LIBTORCH")"
export LIBTORCH
export LIBTORCH_CXX11_ABI=1
# mpirun refuses to run as root without these; the tests and `moe launch` run as root in CI.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Quieter OpenMPI on machines without InfiniBand/UCX hardware.
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader,tcp}" OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
