#!/bin/sh
# Dockerfile.gpu, as root in each final stage: register the CUDA/cuDNN libraries of NVIDIA's pip wheels
# (site-packages/nvidia/*/lib) with the dynamic loader, so ONNX Runtime's CUDA provider finds them by
# soname, then fail the build unless every library that provider links resolves (libcuda.so.1 aside: the
# NVIDIA Container Toolkit mounts the driver's at run time) and the ones it loads later (cuDNN 9, cuFFT 12)
# are registered.
set -eu
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
find "${site}/nvidia" -maxdepth 3 -type d -name lib | sort > /etc/ld.so.conf.d/zz-nvidia-wheels.conf
ldconfig
provider="${site}/onnxruntime/capi/libonnxruntime_providers_cuda.so"
test -f "${provider}" || { echo "no CUDA provider in this onnxruntime: ${provider}" >&2; exit 1; }
missing="$(ldd "${provider}" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"
if [ -n "${missing}" ]; then
    echo "unresolved CUDA libraries of ${provider}:" >&2
    echo "${missing}" >&2
    exit 1
fi
for soname in libcudnn.so.9 libcufft.so.12; do
    ldconfig -p | grep -q "${soname} " || { echo "${soname} is not installed" >&2; exit 1; }
done
echo "CUDA provider libraries resolve: $(wc -l < /etc/ld.so.conf.d/zz-nvidia-wheels.conf) wheel library folders"
