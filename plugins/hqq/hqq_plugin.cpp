// Entry point of the hqq plugin library (libqtune_hqq.so): exports the info record and factory.
#include "hqq_backend.h"
#include "qtune/plugin.h"

QTUNE_QUANT_PLUGIN("hqq", "1.0.0", ::qtune::hqq::HqqBackend)
