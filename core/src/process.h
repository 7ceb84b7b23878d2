// Internal: the allocator policy of core (process.cpp).
#pragma once

namespace qtune {

/// Loaders call this after each matrix they quantize. Core keeps freed heap for the training
/// loop's reuse (process.cpp), but while a model is quantized the small results pin the freed
/// full-precision copies in place and the heap grows by one copy per matrix: the build of a 250M
/// QLoRA model peaked at 1034 MB for a 379 MB result. This returns the free heap to the system
/// once more than 256 MB of it has piled up (then 558 MB).
void return_freed_heap();

}  // namespace qtune
