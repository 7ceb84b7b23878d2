// Entry point of the lora plugin library (libqtune_lora.so): exports the info record and factory.
#include "lora_adapter.h"
#include "qtune/plugin.h"

QTUNE_ADAPTER_PLUGIN("lora", "1.0.0", ::qtune::lora::LoraFactory)
