# Decides whether the CUDA kernels are compiled. Runs before find_package(Torch), because a CUDA
# torch's CMake config needs the toolkit located first. Never asks whether a GPU is present: a
# build machine without a GPU still produces working CUDA kernels.
#
#   TSQ_CUDA=AUTO  compile CUDA when torch is a CUDA build and nvcc is found (default)
#   TSQ_CUDA=ON    the same, but stop with an error that names what is missing
#   TSQ_CUDA=OFF   CPU only, even with a CUDA torch
#
# The toolkit root is taken from CUDA_HOME / CUDA_PATH, else from what `nvcc --dryrun` reports as
# TOP: an `nvcc` on PATH may be a wrapper script, and CMake guesses the root wrongly from it.
#
# Sets: TSQ_WITH_CUDA (ON/OFF), TSQ_CUDA_ROOT, TSQ_CUDA_EXTRA_INCLUDES, TSQ_CUDA_ARCHS.

set(TSQ_CUDA "AUTO" CACHE STRING "Compile the CUDA kernels: AUTO, ON or OFF")
string(TOUPPER "${TSQ_CUDA}" TSQ_CUDA)
if(NOT TSQ_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "TSQ_CUDA must be AUTO, ON or OFF, got '${TSQ_CUDA}'")
endif()

set(TSQ_WITH_CUDA OFF)
set(TSQ_CUDA_ARCHS "")
set(_tsq_cuda_missing "")

if(NOT TSQ_CUDA STREQUAL "OFF")
  if(TSQ_TORCH_CUDA_VERSION STREQUAL "")
    list(APPEND _tsq_cuda_missing
      "torch ${TSQ_TORCH_VERSION} is a CPU-only build (install a CUDA build of torch)")
  endif()

  set(TSQ_CUDA_ROOT "")
  foreach(_var CUDA_HOME CUDA_PATH CUDAToolkit_ROOT)
    if(TSQ_CUDA_ROOT STREQUAL "" AND DEFINED ENV{${_var}} AND EXISTS "$ENV{${_var}}/bin/nvcc")
      set(TSQ_CUDA_ROOT "$ENV{${_var}}")
    endif()
  endforeach()
  if(TSQ_CUDA_ROOT STREQUAL "")
    find_program(_tsq_nvcc nvcc HINTS /usr/local/cuda/bin)
    if(_tsq_nvcc)
      execute_process(COMMAND "${_tsq_nvcc}" --dryrun -x cu -c /dev/null -o /dev/null
        OUTPUT_VARIABLE _tsq_dry ERROR_VARIABLE _tsq_dry RESULT_VARIABLE _tsq_dry_rc)
      if(_tsq_dry MATCHES "#\\$ TOP=([^\n]+)")
        get_filename_component(TSQ_CUDA_ROOT "${CMAKE_MATCH_1}" REALPATH)
      endif()
    endif()
  endif()
  if(TSQ_CUDA_ROOT STREQUAL "" OR NOT EXISTS "${TSQ_CUDA_ROOT}/bin/nvcc")
    list(APPEND _tsq_cuda_missing
      "no CUDA toolkit: nvcc not on PATH and CUDA_HOME not set to a toolkit root")
  endif()

  if(_tsq_cuda_missing STREQUAL "")
    set(TSQ_WITH_CUDA ON)
  elseif(TSQ_CUDA STREQUAL "ON")
    list(JOIN _tsq_cuda_missing "; " _why)
    message(FATAL_ERROR "TSQ_CUDA=ON but the CUDA kernels cannot be built: ${_why}")
  else()
    list(JOIN _tsq_cuda_missing "; " _why)
    message(STATUS "tsqlora_ext: CPU-only build (${_why})")
  endif()
endif()

if(TSQ_WITH_CUDA)
  set(CUDAToolkit_ROOT "${TSQ_CUDA_ROOT}")
  set(CUDA_TOOLKIT_ROOT_DIR "${TSQ_CUDA_ROOT}")
  set(CMAKE_CUDA_COMPILER "${TSQ_CUDA_ROOT}/bin/nvcc")

  # Torch's CUDA headers include cuBLAS/cuSPARSE/... headers that a bare toolkit may lack; the
  # nvidia-* wheels torch depends on ship them under site-packages/nvidia/<name>/include.
  set(TSQ_CUDA_EXTRA_INCLUDES "")
  file(GLOB _tsq_nv_includes LIST_DIRECTORIES true "${TSQ_TORCH_SITE}/nvidia/*/include")
  foreach(_dir IN LISTS _tsq_nv_includes)
    if(EXISTS "${_dir}/cublas_v2.h" OR EXISTS "${_dir}/cusparse.h" OR EXISTS "${_dir}/cudnn.h")
      list(APPEND TSQ_CUDA_EXTRA_INCLUDES "${_dir}")
    endif()
  endforeach()

  # Torch's CMake config also wants libnvrtc; a toolkit without it is completed by the nvidia-*
  # wheel that torch itself loads at run time.
  find_library(CUDA_nvrtc_LIBRARY nvrtc HINTS "${TSQ_CUDA_ROOT}/lib64" NO_DEFAULT_PATH)
  if(NOT CUDA_nvrtc_LIBRARY)
    file(GLOB _tsq_nvrtc "${TSQ_TORCH_SITE}/nvidia/*/lib/libnvrtc.so*")
    list(FILTER _tsq_nvrtc EXCLUDE REGEX "builtins|alt")
    if(_tsq_nvrtc)
      list(GET _tsq_nvrtc 0 _tsq_nvrtc)
      set(CUDA_nvrtc_LIBRARY "${_tsq_nvrtc}" CACHE FILEPATH "libnvrtc for torch's CMake config" FORCE)
    endif()
  endif()

  # Torch's CMake ignores CMAKE_CUDA_ARCHITECTURES; it reads TORCH_CUDA_ARCH_LIST.
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TSQ_CUDA_ARCHS "$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(TSQ_CUDA_ARCHS "8.0;9.0")
    set(ENV{TORCH_CUDA_ARCH_LIST} "${TSQ_CUDA_ARCHS}")
  endif()
  enable_language(CUDA)
  message(STATUS "tsqlora_ext: CUDA build with toolkit ${TSQ_CUDA_ROOT}, archs ${TSQ_CUDA_ARCHS}")
endif()
