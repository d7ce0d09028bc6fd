// Losses.
#pragma once

#include "graph/graph.hpp"
