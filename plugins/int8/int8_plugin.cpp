// Entry point of the int8 plugin library (libqtune_int8.so): exports the info record and factory.
#include "int8_backend.h"
#include "qtune/plugin.h"

QTUNE_QUANT_PLUGIN("int8", "1.0.0", ::qtune::int8::Int8Backend)
