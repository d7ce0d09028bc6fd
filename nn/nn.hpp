// The training toolkit's numeric core: initialisers, optimisers, schedules, clipping,
// safetensors files and checkpoints.
#pragma once

#include "nn/checkpoint.hpp"
#include "nn/clip.hpp"
#include "nn/init.hpp"
#include "nn/model.hpp"
#include "nn/named_tensors.hpp"
#include "nn/optimizer.hpp"
#include "nn/safetensors.hpp"
#include "nn/schedule.hpp"
#include "nn/search.hpp"
#include "nn/trainer.hpp"
