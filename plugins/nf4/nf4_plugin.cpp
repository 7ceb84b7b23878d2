// Entry point of the nf4 plugin library (libqtune_nf4.so): exports the info record and factory.
#include "nf4_backend.h"
#include "qtune/plugin.h"

QTUNE_QUANT_PLUGIN("nf4", "1.0.0", ::qtune::nf4::Nf4Backend)
