// (to be filled)
#pragma once

#include "graph/graph.hpp"
