# Locates the torch the user will import, before find_package(Torch).
#
# Why not `torch` in build-system.requires: pip's default build isolation would then install its
# own (newest allowed) torch into a throw-away environment, and an extension compiled against that
# fails to import (or worse) under the user's torch. pip isolates builds only through PYTHON*
# environment variables (PYTHONPATH + sitecustomize), so the same interpreter started with `-E`
# sees the user's own site-packages. TSQ_TORCH_PYTHON names another interpreter explicitly, for
# front-ends that isolate builds with a separate virtual environment.
#
# Sets: TSQ_TORCH_VERSION, TSQ_TORCH_CUDA_VERSION ("" for CPU builds), TSQ_TORCH_SITE,
# TSQ_TORCH_CMAKE_PREFIX (also appended to CMAKE_PREFIX_PATH), and TSQ_TORCH_LIBSTDCXX: the
# libstdc++ shared library a process that imported torch has loaded ("" where /proc is absent).

if(DEFINED ENV{TSQ_TORCH_PYTHON})
  set(_tsq_torch_python "$ENV{TSQ_TORCH_PYTHON}")
else()
  set(_tsq_torch_python "${Python_EXECUTABLE}")
endif()

execute_process(
  COMMAND "${_tsq_torch_python}" -E -c
    "import os, torch; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(os.path.dirname(torch.__file__))); print(torch.utils.cmake_prefix_path); maps = '/proc/self/maps'; print(next((l.split()[-1] for l in open(maps) if 'libstdc++.so' in l), '') if os.path.exists(maps) else '')"
  OUTPUT_VARIABLE _tsq_torch_probe
  ERROR_VARIABLE _tsq_torch_err
  RESULT_VARIABLE _tsq_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)

if(NOT _tsq_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "tsqlora_ext needs torch installed in the environment it is built for, and "
    "'${_tsq_torch_python} -E -c \"import torch\"' failed:\n${_tsq_torch_err}\n"
    "Install torch first (pip install torch), then pip install . again; or set "
    "TSQ_TORCH_PYTHON to the interpreter whose torch the extension should use.")
endif()

string(REPLACE "\n" ";" _tsq_torch_probe "${_tsq_torch_probe}")
list(GET _tsq_torch_probe 0 TSQ_TORCH_VERSION)
list(GET _tsq_torch_probe 1 TSQ_TORCH_CUDA_VERSION)
list(GET _tsq_torch_probe 2 TSQ_TORCH_SITE)
list(GET _tsq_torch_probe 3 TSQ_TORCH_CMAKE_PREFIX)
list(LENGTH _tsq_torch_probe _tsq_n)
set(TSQ_TORCH_LIBSTDCXX "")
if(_tsq_n GREATER 4)
  list(GET _tsq_torch_probe 4 TSQ_TORCH_LIBSTDCXX)
endif()
# A CPU build prints an empty line for the CUDA version; list(GET) keeps empty elements.
list(APPEND CMAKE_PREFIX_PATH "${TSQ_TORCH_CMAKE_PREFIX}")
message(STATUS "tsqlora_ext: building against torch ${TSQ_TORCH_VERSION} in ${TSQ_TORCH_SITE}"
               " (CUDA: '${TSQ_TORCH_CUDA_VERSION}')")
