// placeholder until the trainer lands
#include "qtune/registry.h"
int main() { return 0; }
