# Links _C against the C++ runtime that torch's process uses, never a private static copy of it.
#
# Some toolchains link libstdc++ statically into shared objects (seen on the GPU machine: a GCC
# 13.3 under /opt/gcc). _C then carries its own iostreams and locale, whose globals nothing
# initialises, and the first error message it formats (TORCH_CHECK -> c10::str ->
# std::ostringstream) segfaults inside that copy. Naming the shared libstdc++ that torch loaded
# ahead of the compiler driver's implicit -lstdc++ makes the linker resolve every libstdc++ symbol
# there, so no member of libstdc++.a is pulled in. A link test guards against a runtime older than
# the compiler's headers need (the build then keeps the toolchain's default, with a warning).
#
# Uses TSQ_TORCH_LIBSTDCXX (cmake/TsqTorch.cmake); needs the target _C.

foreach(_flags CMAKE_SHARED_LINKER_FLAGS CMAKE_MODULE_LINKER_FLAGS)
  string(REPLACE "-static-libstdc++" "" ${_flags} "${${_flags}}")
endforeach()

if(TSQ_TORCH_LIBSTDCXX AND EXISTS "${TSQ_TORCH_LIBSTDCXX}")
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_LIBRARIES "${TSQ_TORCH_LIBSTDCXX}")
  check_cxx_source_compiles([=[
    #include <sstream>
    #include <string>
    int main() { std::ostringstream s; s << 42 << std::string("x"); return s.str().size() == 3 ? 0 : 1; }
  ]=] TSQ_LINKS_TORCH_LIBSTDCXX)
  unset(CMAKE_REQUIRED_LIBRARIES)
  if(TSQ_LINKS_TORCH_LIBSTDCXX)
    target_link_libraries(_C PRIVATE "${TSQ_TORCH_LIBSTDCXX}")
    message(STATUS "tsqlora_ext: C++ runtime ${TSQ_TORCH_LIBSTDCXX} (the one torch loads)")
  else()
    message(WARNING "tsqlora_ext: cannot link against torch's C++ runtime ${TSQ_TORCH_LIBSTDCXX} "
                    "(older than ${CMAKE_CXX_COMPILER} needs?); using the compiler's own")
  endif()
endif()
