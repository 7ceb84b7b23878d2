// Entry point of the int4 example plugin (libqtune_int4.so): the two exported symbols, the info
// record (ABI version, kind, name, version, LibTorch version, C++ ABI) that the registry checks
// first, and the factory.
#include "int4_backend.h"
#include "qtune/plugin.h"

QTUNE_QUANT_PLUGIN("int4", "1.0.0", int4_example::Int4Backend)
