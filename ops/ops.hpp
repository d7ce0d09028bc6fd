// Every op's builder function, family by family.
#pragma once

#include "ops/activation.hpp"
#include "ops/conv.hpp"
#include "ops/elementwise.hpp"
#include "ops/indexing.hpp"
#include "ops/linalg.hpp"
#include "ops/loss.hpp"
#include "ops/math.hpp"
#include "ops/normalization.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"
#include "ops/softmax.hpp"
