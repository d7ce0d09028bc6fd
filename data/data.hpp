// Everything for feeding data to training: IDX files, datasets, loaders, augmentation.
#pragma once

#include "data/augment.hpp"
#include "data/dataset.hpp"
#include "data/idx.hpp"
#include "data/loader.hpp"
#include "data/random.hpp"
