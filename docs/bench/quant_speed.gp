# Drawn by qtune-bench; re-run with `gnuplot quant_speed.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,600 enhanced font 'DejaVu Sans,10'
set output 'quant_speed.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$s << EOD
"nf4" 1.38449 1.3918 1.64284
"nf4 dq=false" 1.34817 1.32563 1.69408
"hqq nbits=4" 1.24861 1.43946 1.58469
"hqq nbits=4 gs=128" 1.26029 1.42115 1.57966
"hqq nbits=3" 1.23421 1.11902 1.41762
"hqq nbits=2 gs=16" 0.707268 1.22651 1.81893
"hqq nbits=2" 1.27771 1.1903 1.39356
"hqq nbits=8" 1.22334 1.1037 1.27777
"int8" 1.02446 1.03018 1.14625
"int8 gs=128" 0.979189 1.06818 1.33273
EOD
set title 'Speed on gaussian 11008x4096 (ratios measured in the same run)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -30 left font ',9'
set ylabel 'ratio (log)'
set logscale y
set key outside top center horizontal
set xrange [-0.6:9.6]
set bmargin 6
plot $s using 2:xtic(1) title 'dequantize to fp32: GB/s / memcpy GB/s', \
     '' using 3 title 'linear fwd+bwd fp32: time / dense fp32', \
     '' using 4 title 'linear fwd+bwd bf16: time / dense bf16', \
     1 with lines dt 2 lc rgb 'black' notitle
