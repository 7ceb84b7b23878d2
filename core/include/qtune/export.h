// Symbol visibility for the core SDK. Plugins are built with hidden visibility; the interface
// classes they implement are exported from libqtune_core so their vtables and RTTI are shared.
#pragma once

#define QTUNE_API __attribute__((visibility("default")))
